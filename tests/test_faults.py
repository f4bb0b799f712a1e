"""The fault model, with real faults: real SIGKILL, real segfaults, real sleeps, real Ctrl-C.

Matrix: fault x backend x ``errors`` mode, where the backend can survive the fault at all (a
segfault in a thread takes the caller down with it; only processes contain it). Every test
runs under a hard time limit, and the suite's guard checks no process or thread is left."""

from __future__ import annotations

import functools
import gc
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import faults
import multitrack as mt
from multitrack.backends import _process, _start, _worker, _zygote
from processes import live_children

pytestmark = pytest.mark.usefixtures("each_start_method")

CRASHES = [
    pytest.param(faults.sigkill_on, "SIGKILL", None, id="sigkill"),
    pytest.param(faults.segfault_on, "SIGSEGV", None, id="segfault"),
    pytest.param(faults.exit_on, None, 7, id="os._exit"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("fn", "signame", "exitcode"), CRASHES)
def test_dead_worker_is_charged_to_its_one_task(
    fn: Any, signame: str | None, exitcode: int | None
) -> None:
    results = mt.map(fn, range(20), workers=2, errors="return")
    assert [r for i, r in enumerate(results) if i != 3] == [i for i in range(20) if i != 3]
    crashed = results[3]
    assert isinstance(crashed, mt.WorkerCrashed)
    assert (crashed.index, crashed.task, crashed.signal, crashed.exitcode) == (
        3,
        3,
        signame,
        exitcode,
    )
    assert crashed.pid is not None and not psutil.pid_exists(crashed.pid)
    if signame == "SIGKILL":
        assert "out-of-memory" in str(crashed)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("fn", "signame", "exitcode"), CRASHES)
def test_dead_worker_raises_promptly_in_raise_mode(
    fn: Any, signame: str | None, exitcode: int | None
) -> None:
    with pytest.raises(mt.WorkerCrashed) as caught:
        mt.map(fn, range(20), workers=2)
    assert caught.value.index == 3 and caught.value.signal == signame


@pytest.mark.timeout(30)
def test_crash_inside_a_chunk_blames_one_item_and_reruns_the_rest() -> None:
    results = mt.map(faults.sigkill_on, range(40), workers=2, chunksize=8, errors="return")
    assert isinstance(results[3], mt.WorkerCrashed)
    assert [r for i, r in enumerate(results) if i != 3] == [i for i in range(40) if i != 3]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("each_start_method")
def test_crash_among_many_quick_tasks_is_charged_to_its_one_task() -> None:
    # Quick tasks run in blocks that mark only the block as running: the first death is
    # charged to nobody, the block's unfinished tasks run again one by one, and the second
    # death is exact. No task loses its result, and the culprit used one attempt.
    bad = 2_345
    crash = functools.partial(faults.sigkill_on, bad=bad)
    results = mt.map(crash, range(5_000), workers=2, errors="return")
    crashed = results[bad]
    assert isinstance(crashed, mt.WorkerCrashed) and crashed.index == bad
    assert crashed.attempts == 1
    assert [r for i, r in enumerate(results) if i != bad] == [i for i in range(5_000) if i != bad]


@pytest.mark.timeout(60)
def test_the_parent_watches_exactly_the_live_workers_descriptors() -> None:
    # Descriptors are registered once per worker and dropped before they are closed: none of
    # a dead worker's stays watched (its number, handed out again to some other file, would
    # be taken for the old worker's), and every live worker's is.
    def descriptors(proc: Any) -> set[int]:
        fds = {proc.conn.fileno()} | ({proc.pidfd} if proc.pidfd is not None else set())
        streams = (proc.popen.stdout, proc.popen.stderr)
        return fds | {s.fileno() for s in streams if s is not None and not s.closed}

    with mt.Pool(workers=2, progress=False) as pool:
        crash = functools.partial(faults.sigkill_on, bad=5)
        assert isinstance(pool.map(crash, range(8), errors="return")[5], mt.WorkerCrashed)
        backend = pool._backend
        assert isinstance(backend, _process.ProcessBackend)
        live = list(backend._procs.values())
        assert len(live) == 2  # the crashed worker was replaced
        assert set(backend._watch._by_fd) == descriptors(live[0]) | descriptors(live[1])
        gone = descriptors(live[0])
        backend.kill(live[0].key)  # killed and reaped, not replaced between calls
        assert not gone & set(backend._watch._by_fd)
        assert set(backend._watch._by_fd) == descriptors(live[1])
        assert pool.map(faults.square, range(4)) == [0, 1, 4, 9]  # and the pool goes on


@pytest.mark.timeout(30)
def test_exceptions_among_many_quick_tasks_keep_every_other_result() -> None:
    of = 97  # failures at the start, middle and end of blocks of quick tasks
    fail = functools.partial(faults.fail_on_multiples, of=of)
    results = mt.map(fail, range(20_000), workers=2, errors="return")
    failed = [i for i, r in enumerate(results) if isinstance(r, mt.TaskError)]
    assert failed == list(range(0, 20_000, of))
    assert all(results[i].index == i for i in failed)
    assert [r for i, r in enumerate(results) if i % of] == [i for i in range(20_000) if i % of]


RAISED = [
    pytest.param(faults.fail_on, ValueError, id="exception"),
    pytest.param(faults.sys_exit_on, SystemExit, id="sys.exit"),
    pytest.param(faults.interrupt_on, KeyboardInterrupt, id="KeyboardInterrupt-in-task"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["process", "thread", "serial"])
@pytest.mark.parametrize(("fn", "kind"), RAISED)
@pytest.mark.parametrize("errors", ["raise", "return"])
def test_whatever_a_task_raises_is_that_tasks_failure(
    backend: str, fn: Any, kind: type, errors: str
) -> None:
    if backend == "serial" and kind is KeyboardInterrupt:
        pytest.skip("serial: a KeyboardInterrupt in the caller's thread is a real Ctrl-C")
    if errors == "raise":
        with pytest.raises(mt.TaskError) as caught:
            mt.map(fn, range(8), backend=backend, workers=2)
        error = caught.value
    else:
        results = mt.map(fn, range(8), backend=backend, workers=2, errors="return")
        assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
        error = results[3]
    assert isinstance(error, mt.TaskError) and error.index == 3
    assert isinstance(error.__cause__, kind)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("errors", ["raise", "return"])
def test_timeout_kills_and_replaces_the_worker(errors: str) -> None:
    hang = functools.partial(faults.pid_unless_hang_on, seconds=60)
    with mt.Pool(workers=2, progress=False) as pool:
        assert pool.map(faults.square, range(4)) == [0, 1, 4, 9]
        before = _live_children()
        assert len(before) == 2
        started = time.monotonic()
        if errors == "raise":
            with pytest.raises(mt.TaskTimeout) as caught:
                pool.map(hang, range(6), timeout=1.0)
            error = caught.value
        else:
            results = pool.map(hang, range(6), timeout=1.0, errors="return")
            assert [r[0] for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
            error = results[3]
            # replaced during the call: two workers again, one of them new
            after = _live_children()
            assert len(after) == 2 and len(after & before) == 1, (before, after)
        assert isinstance(error, mt.TaskTimeout) and isinstance(error, TimeoutError)
        assert error.index == 3
        assert time.monotonic() - started < 20  # not the task's 60 s
        # The hung worker is gone, and the next call runs on two live workers, one of them
        # new. With errors="raise", the other may have been stopped with the call too, and a
        # fresh interpreter may still be starting while the first takes all the tasks.
        used = set(pool.map(faults.pid_after_sleep, [0.2] * 4))
        live = _live_children()
        assert len(live) == 2 and live - before and used <= live, (before, used, live)
        if errors == "return":
            assert used == live


def _live_children() -> set[int]:
    """The live workers (and their children): forks of the zygote are not ours directly."""
    return {child.pid for child in live_children()}


@pytest.mark.timeout(30)
def test_timeout_counts_from_the_start_of_the_task_not_its_queueing() -> None:
    # 6 tasks of 0.4 s on 1 worker: the call lasts ~2.4 s, well past the timeout, but no task
    # runs for more than 0.4 s of it.
    results = mt.map(faults.sleep_for, [0.4] * 6, workers=1, timeout=1.5, chunksize=1)
    assert results == [0.4] * 6


@pytest.mark.timeout(30)
def test_timeout_kills_the_processes_a_task_started(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(mt.TaskTimeout):
        mt.map(faults.spawn_grandchild_and_hang, [0], workers=1, timeout=2.0)
    out, _ = capfd.readouterr()
    grandchild = int(out.split("grandchild ")[1].split()[0])
    assert _gone_within(grandchild, 5.0)


@pytest.mark.timeout(30)
def test_thread_timeout_abandons_the_thread() -> None:
    slow = functools.partial(faults.sleep_on, seconds=1.0)
    results = mt.map(slow, range(6), backend="thread", workers=2, timeout=0.3, errors="return")
    assert isinstance(results[3], mt.TaskTimeout)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]


@pytest.mark.timeout(30)
def test_retries_rerun_a_flaky_task(tmp_path: Path) -> None:
    flaky = functools.partial(faults.flaky, counter_dir=str(tmp_path), fail_times=2)
    assert mt.map(flaky, range(4), workers=2, retries=2) == [0, 1, 2, 3]


@pytest.mark.timeout(30)
def test_retries_give_up_with_the_attempt_count() -> None:
    results = mt.map(faults.sigkill_on, range(6), workers=2, retries=2, errors="return")
    assert isinstance(results[3], mt.WorkerCrashed) and results[3].attempts == 3


# -- what cannot cross the process boundary ------------------------------------------------


@pytest.mark.timeout(30)
def test_unpicklable_result_fails_only_its_task() -> None:
    results = mt.map(faults.lock_on, range(6), workers=2, errors="return")
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(results[3], mt.TaskError)
    assert "lock" in str(results[3]) and "could not be pickled" in str(results[3])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunksize", [1, 4])
def test_unpicklable_argument_fails_only_its_task(chunksize: int) -> None:
    inputs = [1, 2, faults.FailsToPickle(), 4]
    results = mt.map(faults.identity, inputs, workers=2, errors="return", chunksize=chunksize)
    assert results[:2] == [1, 2] and results[3] == 4
    assert isinstance(results[2], mt.TaskError) and "FailsToPickle" in str(results[2])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunksize", [1, 4])
def test_argument_that_fails_to_unpickle_fails_only_its_task(chunksize: int) -> None:
    inputs = [1, faults.FailsToUnpickle(), 3, 4]
    results = mt.map(faults.type_name, inputs, workers=1, errors="return", chunksize=chunksize)
    assert results[0] == "int" and results[2:] == ["int", "int"]
    assert isinstance(results[1], mt.TaskError)
    assert "refuses to be unpickled" in str(results[1])


@pytest.mark.timeout(30)
def test_exception_that_cannot_be_rebuilt_keeps_type_message_and_traceback() -> None:
    results = mt.map(faults.raise_bad_init, range(3), workers=2, errors="return")
    cause = results[1].__cause__
    assert isinstance(cause, mt.RemoteError)
    assert cause.type_name == "faults.BadInit" and "unrebuildable" in cause.message
    assert "raise_bad_init" in cause.traceback_text
    assert results[0] == 0 and results[2] == 2


# -- start-up -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_initializer_traceback_is_kept() -> None:
    with pytest.raises(mt.WorkerStartError) as caught:
        mt.map(faults.square, range(4), workers=2, initializer=faults.failing_initializer)
    assert "initializer exploded" in str(caught.value)
    assert "failing_initializer" in str(caught.value.__cause__.__cause__)


@pytest.mark.timeout(30)
def test_worker_that_never_boots_is_a_start_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_process, "BOOT_TIMEOUT", 1.0)
    monkeypatch.setattr(_start, "_BOOT", "import time; time.sleep(60)")  # a fresh one
    monkeypatch.setattr(_zygote, "for_env", lambda env: None)  # fresh ones, not the zygote's
    monkeypatch.setattr(_worker, "run", lambda *fds: time.sleep(60))  # a fork (it inherits this)
    with pytest.raises(mt.WorkerStartError, match="did not start within"):
        mt.map(faults.square, range(4), workers=2)


# -- nothing outlives a call --------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["process", "thread"])
def test_imap_dropped_half_way_stops_its_workers(backend: str) -> None:
    # Gone at once, not merely before the suite's guard gives up: left alone, the threads
    # would run the other 98 tasks (2.5 s), and workers not killed would be reaped one by one
    # after a second's grace each.
    threads_before = set(threading.enumerate())
    iterator = mt.imap(faults.sleep_for, [0.05] * 100, backend=backend, workers=2)
    next(iterator)
    workers: list[Any]
    if backend == "process":
        workers = live_children()
    else:
        workers = [t for t in threading.enumerate() if t not in threads_before]
    assert len(workers) >= 2, workers
    dropped = time.monotonic()
    del iterator
    gc.collect()
    while _still_running(workers) and time.monotonic() - dropped < PROMPTLY:
        time.sleep(0.01)
    took = time.monotonic() - dropped  # dropping it may itself have taken long
    assert not _still_running(workers), f"{_still_running(workers)} outlived the dropped imap"
    assert took < PROMPTLY, f"its workers took {took:.2f} s to go"


PROMPTLY = 0.5  # seconds: well under the suite's leak guard


def _still_running(workers: list[Any]) -> list[Any]:
    """The worker threads still alive, or the worker processes not yet dead (a zombie is
    dead: its parent's reaping is not the point here)."""
    alive = []
    for worker in workers:
        if isinstance(worker, threading.Thread):
            if worker.is_alive():
                alive.append(worker)
            continue
        try:
            if worker.status() != psutil.STATUS_ZOMBIE:
                alive.append(worker)
        except psutil.NoSuchProcess:
            pass
    return alive


# -- Ctrl-C and a killed parent (real signals to a real script) ----------------------------

SCRIPT = """
import sys, multitrack as mt
sys.path.insert(0, {tests!r})
import faults, functools
job = functools.partial(faults.record_pid_and_sleep, pid_dir={pid_dir!r})
try:
    mt.map(job, [30.0] * 6, workers=2, progress="log")
except KeyboardInterrupt:
    print("caller saw KeyboardInterrupt", flush=True)
    raise
"""


def _start_script(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    code = SCRIPT.format(tests=str(Path(__file__).parent), pid_dir=str(pid_dir))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=dict(os.environ, MULTITRACK_PROGRESS="1"),
    )
    deadline = time.monotonic() + 20
    while len(list(pid_dir.iterdir())) < 2:
        if proc.poll() is not None:
            pytest.fail(f"the script ended early: {proc.communicate()[1]}")
        assert time.monotonic() < deadline, "workers never started"
        time.sleep(0.05)
    return proc, pid_dir


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` is dead now or within ``seconds`` (checked at least once)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("target", ["process-group", "parent-only"])
def test_ctrl_c_stops_the_run_within_a_second(tmp_path: Path, target: str) -> None:
    proc, pid_dir = _start_script(tmp_path)
    sent = time.monotonic()
    if target == "process-group":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does
    else:
        os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=10)
    took = time.monotonic() - sent  # to the script's exit, its interpreter's shutdown included
    workers = [int(pid.name) for pid in pid_dir.iterdir()]
    survivors = [pid for pid in workers if not _gone_within(pid, 0.0)]  # none, already
    out, err = proc.communicate(timeout=10)
    assert "caller saw KeyboardInterrupt" in out, err
    assert took < CTRL_C_WITHIN, f"Ctrl-C took {took:.2f} s"
    assert not survivors, f"workers {survivors} survived Ctrl-C"
    # the interrupt's traceback ends at the caller's line, not in the scheduler's frames
    assert "KeyboardInterrupt" in err
    assert not {"_run.py", "_watch.py", "_process.py"} & set(re.findall(r"\w+\.py", err)), err


# Seconds from Ctrl-C to the script's exit, its workers killed and reaped and its interpreter
# shut down: "within about a second" (it takes 20-40 ms on a 2-core machine).
CTRL_C_WITHIN = 1.0


@pytest.mark.timeout(40)
def test_workers_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    proc, pid_dir = _start_script(tmp_path)
    proc.kill()  # SIGKILL: no cleanup code of the parent runs
    proc.communicate(timeout=10)
    for pid in pid_dir.iterdir():
        assert _gone_within(int(pid.name), 5.0), f"worker {pid.name} outlived its parent"


@pytest.mark.timeout(40)
def test_a_pool_left_open_is_closed_at_interpreter_exit(tmp_path: Path) -> None:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    code = f"""
import sys, functools, multitrack as mt
sys.path.insert(0, {str(Path(__file__).parent)!r})
import faults
pool = mt.Pool(workers=2)
pool.map(functools.partial(faults.record_pid_and_sleep, pid_dir={str(pid_dir)!r}), [0.2] * 4)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    for pid in pid_dir.iterdir():
        assert _gone_within(int(pid.name), 3.0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [700 * 1024, 4 * 1024 * 1024], ids=["700KiB", "4MiB"])
def test_large_arguments_queued_behind_a_hung_task_do_not_block_its_timeout(size: int) -> None:
    # Task 0 hangs in C code holding the GIL, so the worker's reader thread cannot run. The
    # large argument of task 1 must not be pushed into that worker's socket unless it fits in
    # the socket's buffer (700 KiB: sent at once where the buffer could be made 1 MiB; 4 MiB:
    # held back), or the send would wait for the hung task and the timeout could never fire.
    big = b"x" * size
    results = mt.map(
        faults.hold_the_gil_on, [0, big, 2], workers=1, timeout=1.0, chunksize=1, errors="return"
    )
    assert isinstance(results[0], mt.TaskTimeout)
    assert results[1] == big and results[2] == 2


# -- a chunk's end, whatever ended it (the hang family of issue 12) --------------------------

BIG = b"x" * (4 << 20)  # larger than a socket buffer: it waits in the parent's outbox


def _big_result(x: Any) -> Any:
    return BIG if x == "big" else faults.type_name(x)


HELD_BEHIND = [
    pytest.param(1, 1, [faults.FailsToUnpickle(), BIG], id="1-worker-big-arg"),
    pytest.param(2, 1, [faults.FailsToUnpickle(), BIG, faults.FailsToUnpickle(), BIG, BIG], id="2"),
    pytest.param(
        3, None, [BIG, faults.FailsToUnpickle(), BIG, BIG, faults.FailsToUnpickle()], id="3"
    ),
    pytest.param(1, 2, [faults.FailsToUnpickle(), BIG, BIG, 1], id="chunks-of-2"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("workers", "chunksize", "args"), HELD_BEHIND)
@pytest.mark.parametrize("api", ["map", "imap", "pool"])
def test_an_argument_that_fails_to_unpickle_never_strands_the_messages_behind_it(
    workers: int, chunksize: int | None, args: list[Any], api: str
) -> None:
    # The worker could not unpickle a chunk's arguments; the chunk was ended by a path other
    # than its results, and the multi-MB chunks queued behind it were never sent: a hang.
    options: dict[str, Any] = {"workers": workers, "chunksize": chunksize, "errors": "return"}
    if api == "map":
        results = mt.map(faults.type_name, args, **options)
    elif api == "imap":
        results = list(mt.imap(faults.type_name, args, **options))
    else:
        with mt.Pool(workers=workers) as pool:
            pool.map(faults.type_name, args, chunksize=chunksize, errors="return")
            results = pool.map(faults.type_name, args, chunksize=chunksize, errors="return")
    for arg, result in zip(args, results, strict=True):
        if isinstance(arg, faults.FailsToUnpickle):
            assert isinstance(result, mt.TaskError) and "refuses to be unpickled" in str(result)
        else:
            assert result == type(arg).__name__


@pytest.mark.timeout(30)
def test_big_results_beside_arguments_that_fail_to_unpickle() -> None:
    args = ["big", faults.FailsToUnpickle(), "big", BIG, faults.FailsToUnpickle(), "big"]
    results = mt.map(_big_result, args, workers=2, chunksize=2, errors="return")
    assert [r if not isinstance(r, mt.TaskError) else "error" for r in results] == [
        BIG,
        "error",
        BIG,
        "bytes",
        "error",
        BIG,
    ]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("fn", "frame"),
    [
        (functools.partial(faults.sleep_on, seconds=60, bad=1), "in sleep_on"),
        (functools.partial(faults.hold_the_gil_on, bad=1), "in hold_the_gil_on"),  # stuck in C
    ],
    ids=["sleeping", "in-C-holding-the-GIL"],
)
def test_a_timed_out_task_says_where_it_was_stopped(fn: Any, frame: str) -> None:
    results = mt.map(fn, [0, 1, 2], workers=2, timeout=1.0, errors="return")
    error = results[1]
    assert isinstance(error, mt.TaskTimeout) and error.stack is not None
    assert frame in error.stack and "faults.py" in error.stack
    assert "_worker.py" not in error.stack and "_run.py" not in error.stack  # the task's alone
    assert frame in "".join(getattr(error, "__notes__", []))  # shown under the traceback


def test_a_worker_that_runs_nothing_is_not_asked_to_give_back_what_it_holds() -> None:
    # It starts its next task at once, and what it holds may still be on its way to it: asked
    # back, a chunk of 4 MB arguments went back whole to the same worker, again and again
    # (16 tasks sent 72 times while an idle second worker kept asking).
    import mmap
    import tempfile
    import time
    import types

    from multitrack.backends import _protocol

    held = types.SimpleNamespace(split=False, chunk=types.SimpleNamespace(indices=[0, 1, 2, 3]))
    with tempfile.TemporaryFile() as file:
        file.truncate(_protocol.SLOT_SIZE)
        slot = _protocol.Slot(file.fileno())
        view = mmap.mmap(file.fileno(), _protocol.SLOT_SIZE)
        proc = types.SimpleNamespace(
            slot=view, chunks={7: held}, asked_to_give_back=set(), state=_process.State.READY
        )
        assert _process._queued_behind(proc) == 0  # a fresh slot: it runs nothing yet
        slot.start_chunk(7, 0, time.monotonic())
        assert _process._queued_behind(proc) == 3  # running the first: three wait behind it
        slot.start_chunk(_protocol.IDLE, 0, 0.0)
        assert _process._queued_behind(proc) == 0  # between tasks: it starts the next at once
        proc.state = _process.State.INITIALIZING  # its initializer may take minutes
        assert _process._queued_behind(proc) == 3  # it keeps the task it will run first
        view.close()
