"""The mmengine drop-ins: the same results as real mmengine 0.10, and its defects fixed.

The task functions live at module level here: workers import this module by name (the tests
directory is on the caller's sys.path, which both mmengine's fork pool and our workers see).
Every worker of ours is a fresh interpreter that imports this module, so the heavy imports
(mmengine.utils alone takes ~0.6 s) are made inside the tests, not at the top.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import faults
import multitrack as mt
from multitrack._mmengine import TTY_INTERVAL, TrackBar, format_bar
from multitrack.backends import _platform

_OFFSET = 0


def square(x: int) -> int:
    return x * x


def set_offset(value: int) -> None:
    global _OFFSET
    _OFFSET = value


def add_offset(x: int) -> int:
    return x + _OFFSET


def scale(x: int, *, factor: int) -> int:
    return x * factor


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad input {x}")
    return x


def die_on_three(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def slow_first(x: int) -> int:
    if x == 0:
        time.sleep(1.5)
    return x


def fail_to_start() -> None:
    raise RuntimeError("no GPU here")


def shout(x: int) -> int:
    print(f"hello from task {x}")
    return x


class FakeTTY(io.StringIO):
    """A terminal as far as the bar can tell."""

    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def bar_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest switches bars off suite-wide; these tests are about the bar."""
    monkeypatch.delenv("MULTITRACK_PROGRESS", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("COLUMNS", "200")


def _children() -> list[Any]:
    from processes import live_children

    return live_children()


# -- the same results as mmengine ---------------------------------------------------------

EQUIVALENCE: dict[str, tuple[Callable[[Any], Any], Callable[[], Any], dict[str, Any]]] = {
    "list": (square, lambda: list(range(30)), {}),
    "generator_pair": (square, lambda: ((x for x in range(30)), 30), {}),
    "unordered": (square, lambda: list(range(30)), {"keep_order": False}),
    "chunksize": (square, lambda: list(range(30)), {"chunksize": 4}),
    "initializer": (
        add_offset,
        lambda: list(range(10)),
        {"initializer": set_offset, "initargs": (100,)},
    ),
    "skip_first": (square, lambda: list(range(12)), {"skip_first": True}),
}


@pytest.mark.parametrize("case", EQUIVALENCE)
def test_parallel_matches_mmengine(case: str) -> None:
    from mmengine.utils import track_parallel_progress as mm_tpp

    func, make_tasks, options = EQUIVALENCE[case]
    theirs = mm_tpp(func, make_tasks(), 2, file=io.StringIO(), **options)
    ours = mt.track_parallel_progress(func, make_tasks(), 2, file=io.StringIO(), **options)
    if case == "initializer":
        assert theirs[0] == 100  # the initializer ran in every worker
    if options.get("keep_order", True):
        assert ours == theirs
    else:
        assert sorted(ours) == sorted(theirs)


@pytest.mark.parametrize("tasks", [[3, 1, 2], "abc", [], ([5, 1, 4], 3)])
def test_serial_functions_match_mmengine(tasks: Any) -> None:
    from mmengine.utils import track_iter_progress as mm_tip
    from mmengine.utils import track_progress as mm_tp

    ours = mt.track_progress(scale, tasks, file=io.StringIO(), factor=2)
    assert ours == mm_tp(scale, tasks, file=io.StringIO(), factor=2)
    ours = list(mt.track_iter_progress(tasks, file=io.StringIO()))
    assert ours == list(mm_tip(tasks, file=io.StringIO()))


@pytest.mark.parametrize(
    "name", ["track_parallel_progress", "track_progress", "track_iter_progress"]
)
def test_signatures_match_mmengine(name: str) -> None:
    import mmengine.utils

    ours = dict(inspect.signature(getattr(mt, name)).parameters)
    theirs = inspect.signature(getattr(mmengine.utils, name)).parameters
    # the keywords multitrack adds: keyword-only, after all of mmengine's, with a default
    added = [p for p in ours.values() if p.name not in theirs]
    assert all(p.kind is p.KEYWORD_ONLY and p.default is None for p in added)
    expected = ["checkpoint", "start_method"] if name == "track_parallel_progress" else []
    assert [p.name for p in added] == expected
    for param in added:
        del ours[param.name]
    assert list(ours) == list(theirs)
    for param, other in zip(ours.values(), theirs.values(), strict=True):
        assert param.kind == other.kind
        if param.name != "file":  # both are "the sys.stdout seen at import"
            assert param.default == other.default


@pytest.mark.parametrize(
    ("completed", "total", "elapsed", "columns"),
    [
        (3, 10, 2.5, 200),
        (10, 10, 4.0, 200),
        (1, 7, 0.0, 200),  # no time yet: an infinite rate, as in mmengine
        (1234, 20000, 61.3, 200),
        (5, 10, 2.0, 70),  # the bar shrinks to fit the terminal
        (5, 10, 2.0, 20),  # down to 2 characters
        (4, 0, 1.2, 200),  # no total
    ],
)
def test_bar_line_matches_mmengine(
    completed: int, total: int, elapsed: float, columns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmengine.utils import ProgressBar as MMProgressBar

    monkeypatch.setenv("COLUMNS", str(columns))
    out = io.StringIO()
    bar = MMProgressBar(total, 50, start=False, file=out)
    bar.timer = SimpleNamespace(since_start=lambda: elapsed)
    bar.completed = completed - 1
    bar.update()
    assert format_bar(completed, total, elapsed, 50, columns) == out.getvalue().lstrip("\r")


def test_the_drop_ins_bar_width_follows_columns_as_mmengines_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # mmengine reads COLUMNS first (shutil.get_terminal_size), then the terminal's size: on a
    # 200-column terminal with COLUMNS=70 its lines fit 70 columns, and so must ours.
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    try:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))

        class Terminal(FakeTTY):
            def fileno(self) -> int:
                return follower

        monkeypatch.setenv("COLUMNS", "70")
        out = Terminal()
        mt.track_parallel_progress(abs, [-1, -2, -3], nproc=2, file=out)
    finally:
        os.close(leader)
        os.close(follower)
    lines = [line for line in out.getvalue().replace("\r", "\n").splitlines() if "[" in line]
    assert lines and all(len(line) <= 70 for line in lines), lines


def test_start_line_matches_mmengine() -> None:
    from mmengine.utils import ProgressBar as MMProgressBar

    for total in (10, 0):
        out = io.StringIO()
        MMProgressBar(total, 50, file=out)
        assert format_bar(0, total, 0.0, 50, None) == out.getvalue()


# -- what mmengine gets wrong -------------------------------------------------------------


def test_any_iterable_and_any_function_are_accepted() -> None:
    from mmengine.utils import track_parallel_progress as mm_tpp

    values = {"a": 1, "b": 2, "c": 3}.values()
    with pytest.raises(TypeError, match="dict_values"):
        mm_tpp(square, values, 2, file=io.StringIO())
    # A lambda too: it travels by value, mmengine's Pool cannot pickle it.
    assert mt.track_parallel_progress(lambda x: -x, values, 2, file=io.StringIO()) == [-1, -2, -3]
    out = io.StringIO()
    assert mt.track_progress(square, (x for x in range(4)), file=out) == [0, 1, 4, 9]
    assert out.getvalue().startswith("completed: 0, elapsed: 0s\n")  # no total known yet
    assert mt.track_progress(square, (1, 2, 3), file=io.StringIO()) == [1, 4, 9]  # not a pair
    assert list(mt.track_iter_progress({7}, file=io.StringIO())) == [7]


def test_not_iterable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match='"tasks" must be an iterable'):
        mt.track_parallel_progress(square, 5, 2, file=io.StringIO())


def test_log_output_is_small_for_20k_tasks() -> None:
    out = io.StringIO()
    results = mt.track_parallel_progress(square, range(20_000), 2, file=out)
    assert results[-1] == 19_999**2 and len(results) == 20_000
    text = out.getvalue()
    assert len(text) < 5_000
    assert "\r" not in text
    assert text.endswith("\n")
    assert "] 20000/20000, " in text.splitlines()[-1]


def test_the_bar_counts_completions_not_ordered_results() -> None:
    out = FakeTTY()
    assert mt.track_parallel_progress(slow_first, range(21), 2, file=out) == list(range(21))
    counts = [int(part.split("] ")[1].split("/")[0]) for part in out.getvalue().split("\r")]
    assert any(10 <= count < 21 for count in counts), counts  # mmengine: 0/21 until task 0


def test_terminal_redraws_are_throttled() -> None:
    out = FakeTTY()
    started = time.monotonic()
    mt.track_progress(square, range(20_000), file=out)
    elapsed = time.monotonic() - started
    text = out.getvalue()
    assert text.count("\r") <= elapsed / TTY_INTERVAL + 2
    assert "] 20000/20000, " in text.rsplit("\r", 1)[1]
    assert len(text) < 20_000 and text.endswith("s\n")


def test_log_lines_come_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTITRACK_LOG_INTERVAL", "10")  # the knob of every multitrack log
    clock, out = FakeClock(), io.StringIO()
    bar = TrackBar(100, file=out, clock=clock)
    assert bar.wakeup_in() == 10.0
    for _ in range(50):
        clock.now += 0.5
        bar.advance()
    bar.tick()
    clock.now += 5
    assert bar.wakeup_in() == 0.0  # a heartbeat is due even without completions
    bar.tick()
    bar.advance(50)
    bar.close()
    bar.close()  # idempotent
    lines = out.getvalue().splitlines()
    counts = [line.split("] ")[1].split(",")[0] for line in lines]
    assert counts == ["0/100", "20/100", "40/100", "50/100", "100/100"]
    assert lines[1].endswith("elapsed: 10s, ETA:    40s")


def test_terminal_bar_ticks_and_pads() -> None:
    clock, out = FakeClock(), FakeTTY()
    bar = TrackBar(None, file=out, clock=clock)
    bar.advance(1000)  # too soon after the first draw: not drawn yet
    assert bar.wakeup_in() == pytest.approx(TTY_INTERVAL)
    clock.now += TTY_INTERVAL
    bar.tick()
    bar.set_total(1000)
    bar.close()
    assert out.getvalue() == (
        "completed: 0, elapsed: 0s"
        "\rcompleted: 1000, elapsed: 0s, 10000.0 tasks/s"
        "\r[" + ">" * 50 + "] 1000/1000, 10000.0 task/s, elapsed: 0s, ETA:     0s\n"
    )


def test_skip_first_starts_the_clock_after_the_skipped_tasks() -> None:
    clock, out = FakeClock(), io.StringIO()
    bar = TrackBar(10, file=out, skip=4, clock=clock)
    clock.now += 30  # slow start-up: left out of the rate
    bar.advance(3)
    assert out.getvalue() == ""
    bar.advance(2)  # one skipped, one counted
    clock.now += 2
    bar.close()
    assert out.getvalue().splitlines() == [
        "[" + " " * 50 + "] 0/6, elapsed: 0s, ETA:",
        "[" + ">" * 8 + " " * 42 + "] 1/6, 0.5 task/s, elapsed: 2s, ETA:    10s",
    ]


def test_worker_output_is_written_above_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    clock, out = FakeClock(), FakeTTY()
    bar = TrackBar(4, file=out, clock=clock)
    bar.write("hello\n")
    bar.write("oops\n", stream="stderr")
    bar.close()
    start = "[" + " " * 50 + "] 0/4, elapsed: 0s, ETA:"
    blank = "\r" + " " * len(start) + "\r"
    assert out.getvalue() == start + blank + start + blank + start + "\r" + start + "\n"
    assert capsys.readouterr() == ("hello\n", "oops\n")


def test_generator_and_worker_prints(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    results = mt.track_parallel_progress(shout, (x for x in range(3)), 2, file=out)
    assert results == [0, 1, 2]
    printed = capsys.readouterr().out
    assert sorted(printed.splitlines()) == [f"hello from task {x}" for x in range(3)]
    assert out.getvalue().endswith("\n")


def test_a_failing_task_raises_catchably_and_stops_the_pool() -> None:
    out = io.StringIO()
    with pytest.raises(ValueError, match="bad input 3") as caught:
        mt.track_parallel_progress(fail_on_three, range(20), 2, file=out)
    assert _children() == []
    error = caught.value
    assert isinstance(error, mt.TaskError)
    assert (error.index, error.task, error.args) == (3, 3, ("bad input 3",))
    assert type(error.__cause__) is ValueError
    assert str(error) == "task 3 (input 3) failed: ValueError: bad input 3"
    assert type(pickle.loads(pickle.dumps(error))) is type(error)
    assert out.getvalue().endswith("\n")


@pytest.mark.timeout(30)
def test_a_killed_worker_raises_instead_of_hanging() -> None:
    started = time.monotonic()
    with pytest.raises(mt.WorkerCrashed) as caught:
        mt.track_parallel_progress(die_on_three, range(10), 2, file=io.StringIO())
    assert time.monotonic() - started < 15
    assert (caught.value.index, caught.value.signal) == (3, "SIGKILL")
    assert _children() == []


@pytest.mark.timeout(30)
def test_a_failing_initializer_raises_instead_of_looping() -> None:
    with pytest.raises(mt.WorkerStartError, match="no GPU here"):
        mt.track_parallel_progress(square, [1, 2], 2, initializer=fail_to_start, file=io.StringIO())
    assert _children() == []


def test_serial_errors_propagate_untouched() -> None:
    out = io.StringIO()
    with pytest.raises(ValueError, match="bad input 3") as caught:
        mt.track_progress(fail_on_three, range(5), file=out)
    assert type(caught.value) is ValueError
    assert out.getvalue().endswith("\n")


# -- arguments ------------------------------------------------------------------------------


def test_initargs_rules_follow_mmengine() -> None:
    from mmengine.utils import track_parallel_progress as mm_tpp

    for track in (mm_tpp, mt.track_parallel_progress):
        with pytest.raises(TypeError, match='"initargs" must be a tuple'):
            track(add_offset, [1], 2, initializer=set_offset, initargs=[5], file=io.StringIO())
    # Without an initializer mmengine ignores initargs, whatever they are.
    assert mt.track_parallel_progress(square, [3], 1, initargs=[5], file=io.StringIO()) == [9]


@pytest.mark.parametrize(("nproc", "error"), [(0, ValueError), ("2", TypeError)])
def test_bad_nproc_is_named(nproc: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="nproc"):
        mt.track_parallel_progress(square, [1], nproc, file=io.StringIO())


def test_track_progress_passes_kwargs() -> None:
    assert mt.track_progress(scale, [1, 2], file=io.StringIO(), factor=3) == [3, 6]


def test_track_iter_progress_yields_in_order_and_ends_the_line_on_break() -> None:
    out = io.StringIO()
    seen = []
    iterator = mt.track_iter_progress(list(range(5)), file=out)
    for task in iterator:
        seen.append(task)
        if task == 2:
            break
    assert seen == [0, 1, 2]
    iterator.close()
    assert out.getvalue().splitlines()[-1].startswith("[" + ">" * 20 + " " * 30 + "] 2/5, ")


def test_default_file_is_the_stdout_of_the_call() -> None:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        mt.track_progress(square, [1, 2])
        list(mt.track_iter_progress([1], file=None))
    assert buffer.getvalue().count("\n") == 4 and "] 2/2, " in buffer.getvalue()


def test_environment_switches_the_bar_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTITRACK_PROGRESS", "0")
    out = io.StringIO()
    assert mt.track_progress(square, [1, 2], file=out) == [1, 4]
    assert out.getvalue() == ""


def test_numpy_integers_are_accepted_as_mmengine_accepts_them() -> None:
    np = pytest.importorskip("numpy")
    out = io.StringIO()
    results = mt.track_parallel_progress(
        square, [1, 2, 3], np.int64(2), chunksize=np.int64(2), bar_width=np.int32(20), file=out
    )
    assert results == [1, 4, 9]
    with pytest.raises(TypeError, match="chunksize"):
        mt.track_parallel_progress(square, [1], 2, chunksize=2.0, file=out)


def test_the_drop_in_resumes_from_a_checkpoint(tmp_path: Path) -> None:
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    work = functools.partial(faults.logged_square, log_dir=str(log_dir))
    journal = tmp_path / "run.sqlite"
    out = io.StringIO()
    assert mt.track_parallel_progress(work, [1, 2, 3], 2, file=out, checkpoint=journal) == [1, 4, 9]
    assert mt.track_parallel_progress(work, [1, 2, 3, 4], 2, file=out, checkpoint=journal) == [
        1,
        4,
        9,
        16,
    ]
    assert sorted(int(name.split("-")[0]) for name in os.listdir(log_dir)) == [1, 2, 3, 4]


@pytest.mark.skipif(not _platform.CAN_FORK, reason="fork is not available here")
def test_the_drop_in_forks_the_caller_as_mmengine_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # mmengine forks the caller on Linux: a global set at run time is seen, numpy or not.
    monkeypatch.setattr(faults, "SCALE", 10)
    out = io.StringIO()
    assert mt.track_parallel_progress(faults.scaled, [1, 2], 2, file=out) == [10, 20]
    got = mt.track_parallel_progress(faults.scaled, [1, 2], 2, file=out, start_method="spawn")
    assert got == [1, 2]
    monkeypatch.setenv("MULTITRACK_START_METHOD", "spawn")  # a script's choice holds too
    assert mt.track_parallel_progress(faults.scaled, [1, 2], 2, file=out) == [1, 2]


@pytest.mark.skipif(not _platform.CAN_FORK, reason="fork is not available here")
def test_the_drop_in_does_not_fork_while_a_python_thread_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(faults, "SCALE", 10)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="uploader")
    other.start()
    try:
        with pytest.warns(RuntimeWarning, match=r"\(uploader\).*fresh interpreters"):
            got = mt.track_parallel_progress(faults.scaled, [1, 2], 2, file=io.StringIO())
        assert got == [1, 2]
    finally:
        stop.set()
        other.join()
