"""The progress bar on its own: mode choice, status-line cadence on a fake clock, the live tqdm
bar on a fake terminal, worker output above the bar, and nothing left running."""

from __future__ import annotations

import importlib.util
import io
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator

import pytest
from tqdm import tqdm as _std_tqdm

from multitrack import _progress, _tqdm_bar
from multitrack._progress import (
    LogProgress,
    NullProgress,
    Progress,
    TqdmProgress,
    make_progress,
)

ENV = ("MULTITRACK_PROGRESS", "TQDM_DISABLE", "MULTITRACK_LOG_INTERVAL", "TQDM_MININTERVAL")


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeTTY(io.StringIO):
    """A terminal, as far as ``isatty`` can tell."""

    def isatty(self) -> bool:
        return True


def screen(output: str) -> list[str]:
    """What a terminal shows after ``output``: ``\\r`` returns to column 0 and overwrites."""
    lines: list[list[str]] = [[]]
    col = 0
    for char in output:
        if char == "\r":
            col = 0
        elif char == "\n":
            lines.append([])
            col = 0
        else:
            line = lines[-1]
            if col < len(line):
                line[col] = char
            else:
                line.append(char)
            col += 1
    return ["".join(line).rstrip() for line in lines if "".join(line).strip()]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite switches bars off by default; these tests decide for themselves."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def no_open_bars() -> Iterator[None]:
    """A bar left open would sit above the next test's bar (tqdm stacks open bars)."""
    yield
    open_bars = [bar for bar in list(_std_tqdm._instances) if isinstance(bar, _tqdm_bar._TextBar)]
    for bar in open_bars:  # do not let one failure cascade into every later test
        bar.close()
    assert not open_bars, "a test left a bar open"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def log() -> io.StringIO:
    return io.StringIO()


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# -- choosing the mode --------------------------------------------------------------------------


def test_terminal_gets_the_live_bar() -> None:
    progress = make_progress(True, total=3, desc="job", file=FakeTTY())
    assert isinstance(progress, TqdmProgress) and not progress.is_widget
    progress.close()


def test_pipe_or_file_gets_status_lines() -> None:
    assert isinstance(make_progress(True, total=3, desc=None, file=io.StringIO()), LogProgress)


def test_log_forces_status_lines_on_a_terminal() -> None:
    tty = FakeTTY()
    progress = make_progress("log", total=3, desc="job", file=tty)
    assert isinstance(progress, LogProgress)
    progress.advance(3)
    progress.close()
    assert "\r" not in tty.getvalue() and "job: done 3/3" in tty.getvalue()


def test_false_turns_it_off() -> None:
    assert type(make_progress(False, total=3, desc=None, file=FakeTTY())) is NullProgress


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no", " 0 "])
def test_multitrack_progress_env_turns_it_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MULTITRACK_PROGRESS", value)
    for mode in (True, "log"):
        assert type(make_progress(mode, total=3, desc=None, file=FakeTTY())) is NullProgress


@pytest.mark.parametrize("value", ["1", "true", "True", "yes"])
def test_tqdm_disable_env_turns_it_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TQDM_DISABLE", value)
    assert type(make_progress(True, total=3, desc=None, file=FakeTTY())) is NullProgress


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_falsy_tqdm_disable_keeps_it_on(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TQDM_DISABLE", value)
    assert isinstance(make_progress(True, total=3, desc=None, file=io.StringIO()), LogProgress)


def test_other_env_values_keep_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTITRACK_PROGRESS", "1")
    assert isinstance(make_progress(True, total=3, desc=None, file=io.StringIO()), LogProgress)


def test_default_stream_is_stderr_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    progress = make_progress(True, total=2, desc="late", file=None)
    assert isinstance(progress, LogProgress)
    progress.close()
    assert err.getvalue().startswith("late: done 0/2")


def test_no_stderr_at_all_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", None)
    assert type(make_progress(True, total=2, desc=None)) is NullProgress


def test_unknown_progress_value_is_refused() -> None:
    with pytest.raises(ValueError, match="progress"):
        make_progress("loud", total=1, desc=None)


# -- Jupyter ------------------------------------------------------------------------------------


def test_notebook_without_ipywidgets_falls_back_to_the_text_bar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(_progress, "_in_notebook", lambda: True)
    monkeypatch.setattr(_tqdm_bar, "_widget_class", lambda: None)
    progress = make_progress(True, total=4, desc="nb", file=None)
    assert isinstance(progress, TqdmProgress) and not progress.is_widget
    progress.advance(4)
    progress.close()
    assert "nb: 100%" in screen(out.getvalue())[-1]


def test_widget_that_cannot_start_falls_back_to_the_text_bar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class BrokenWidget:
        def __init__(self, **_: object) -> None:
            raise RuntimeError("no front end")

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(_progress, "_in_notebook", lambda: True)
    monkeypatch.setattr(_tqdm_bar, "_widget_class", lambda: BrokenWidget)
    progress = make_progress(True, total=4, desc="nb")
    assert isinstance(progress, TqdmProgress) and not progress.is_widget
    progress.close()


def test_missing_ipywidgets_is_detected_quietly() -> None:
    has_ipywidgets = importlib.util.find_spec("ipywidgets") is not None
    # and no warning either way: the suite turns warnings into errors
    assert (_tqdm_bar._widget_class() is not None) == has_ipywidgets


def test_explicit_file_in_a_notebook_gets_status_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_progress, "_in_notebook", lambda: True)
    assert isinstance(make_progress(True, total=1, desc=None, file=io.StringIO()), LogProgress)


def _fake_kernel(monkeypatch: pytest.MonkeyPatch, shell_class: str) -> None:
    shell = type(shell_class, (), {})()
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    for name in [n for n in os.environ if n == "QT_API" or n.startswith("SPYDER")]:
        monkeypatch.delenv(name)


def test_notebook_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _progress._in_notebook()  # plain pytest
    _fake_kernel(monkeypatch, "ZMQInteractiveShell")
    assert _progress._in_notebook()
    monkeypatch.setenv("QT_API", "pyqt5")  # jupyter qtconsole: a text console
    assert not _progress._in_notebook()


def test_qtconsole_shell_is_not_a_notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_kernel(monkeypatch, "QtShell")
    assert not _progress._in_notebook()


# -- status lines (LogProgress) -----------------------------------------------------------------


def test_status_lines_follow_the_interval(clock: FakeClock, log: io.StringIO) -> None:
    progress = LogProgress(total=1000, desc="job", file=log, clock=clock)
    assert progress.wakeup_in() == 30.0
    clock.advance(10)
    progress.advance(100)
    progress.tick()
    assert log.getvalue() == ""  # nothing before the first interval
    assert progress.wakeup_in() == 20.0
    clock.advance(20)
    progress.advance(200)
    assert lines_of(log) == ["job: 300/1000 (30%) elapsed 00:30, eta 01:10, 10.0 task/s"]
    assert progress.wakeup_in() == 30.0
    clock.advance(29)
    progress.tick()
    assert len(lines_of(log)) == 1
    clock.advance(1)
    progress.tick()  # due even though nothing completed: the rate drops, the ETA grows
    assert lines_of(log)[1] == "job: 300/1000 (30%) elapsed 01:00, eta 01:40, 7.0 task/s"
    progress.close()
    assert lines_of(log)[2] == "job: done 300/1000 (30%) in 01:00, 5.0 task/s"
    assert progress.wakeup_in() is None


def test_a_long_stall_gives_one_line_not_a_burst(clock: FakeClock, log: io.StringIO) -> None:
    progress = LogProgress(total=10, desc="job", file=log, clock=clock)
    clock.advance(100)
    progress.tick()
    progress.tick()
    assert len(lines_of(log)) == 1
    assert progress.wakeup_in() == 20.0  # back on the 30 s grid
    progress.close()


def test_interval_from_env(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock, log: io.StringIO
) -> None:
    monkeypatch.setenv("MULTITRACK_LOG_INTERVAL", "0.5")
    progress = make_progress(True, total=None, desc="job", file=log, clock=clock)
    assert isinstance(progress, LogProgress) and progress.interval == 0.5
    clock.advance(0.5)
    progress.advance(5)
    assert lines_of(log) == ["job: 5 elapsed 00:00, 10.0 task/s"]
    progress.close()


@pytest.mark.parametrize("value", ["soon", "0", "-3", "inf", "nan", ""])
def test_bad_interval_env_means_default(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MULTITRACK_LOG_INTERVAL", value)
    assert LogProgress(total=1, desc=None, file=io.StringIO()).interval == 30.0


@pytest.mark.parametrize(
    ("outcome", "word"),
    [("done", "done"), ("error", "stopped"), ("interrupted", "interrupted"), ("closed", "closed")],
)
def test_final_summary_names_the_outcome(
    clock: FakeClock, log: io.StringIO, outcome: _progress.Outcome, word: str
) -> None:
    progress = LogProgress(total=10000, desc="resize", file=log, clock=clock)
    clock.advance(19.5)
    progress.advance(6300)
    progress.add_failed(2)
    progress.close(outcome)
    assert log.getvalue() == (f"resize: {word} 6300/10000 (63%) in 00:19, 323.1 task/s, failed=2\n")


def test_failed_and_retried_are_shown_when_nonzero(clock: FakeClock, log: io.StringIO) -> None:
    progress = LogProgress(total=100, desc="job", file=log, clock=clock, interval=10)
    clock.advance(10)
    progress.advance(10)
    progress.add_retried()
    clock.advance(10)
    progress.advance(10)
    progress.add_failed(2)
    progress.add_retried()
    clock.advance(10)
    progress.advance(10)
    assert lines_of(log) == [
        "job: 10/100 (10%) elapsed 00:10, eta 01:30, 1.0 task/s",
        "job: 20/100 (20%) elapsed 00:20, eta 01:20, 1.0 task/s, retried=1",
        "job: 30/100 (30%) elapsed 00:30, eta 01:10, 1.0 task/s, failed=2, retried=2",
    ]
    progress.close()


def test_unknown_total_counts_without_one(clock: FakeClock, log: io.StringIO) -> None:
    progress = LogProgress(total=None, desc="scan", file=log, clock=clock)
    clock.advance(30)
    progress.advance(6300)
    clock.advance(1)
    progress.close()
    assert lines_of(log) == [
        "scan: 6300 elapsed 00:30, 210.0 task/s",
        "scan: done 6300 in 00:31, 203.2 task/s",
    ]


def test_set_total_and_an_overrun_total(clock: FakeClock, log: io.StringIO) -> None:
    progress = LogProgress(total=None, desc="job", file=log, clock=clock)
    progress.set_total(8)
    progress.advance(10)  # more than the (hinted) total: shown as unknown, not 125%
    clock.advance(30)
    progress.tick()
    progress.set_total(10)
    progress.close()
    assert lines_of(log) == [
        "job: 10 elapsed 00:30, 3.0 s/task",
        "job: done 10/10 (100%) in 00:30, 3.0 s/task",
    ]


def test_no_completions_and_no_desc(clock: FakeClock, log: io.StringIO) -> None:
    progress = LogProgress(total=5, desc=None, file=log, clock=clock)
    clock.advance(30)
    progress.tick()
    progress.close()
    assert lines_of(log) == [
        "multitrack: 0/5 (0%) elapsed 00:30, eta ?, ? task/s",
        "multitrack: done 0/5 (0%) in 00:30, ? task/s",
    ]


def test_empty_run_is_complete(clock: FakeClock, log: io.StringIO) -> None:
    progress = LogProgress(total=0, desc="job", file=log, clock=clock)
    progress.close()
    assert log.getvalue() == "job: done 0/0 (100%) in 00:00, ? task/s\n"


def test_short_big_run_writes_only_the_summary(clock: FakeClock, log: io.StringIO) -> None:
    progress = LogProgress(total=20_000, desc="map", file=log, clock=clock)
    start = clock.now
    for i in range(1, 20_001):  # 20,000 tasks over 2 s
        clock.now = start + i / 10_000
        progress.advance()
        progress.tick()
    progress.close()
    assert lines_of(log) == ["map: done 20000/20000 (100%) in 00:02, 10000.0 task/s"]


def test_20000_real_advances_stay_small_and_plain(log: io.StringIO) -> None:
    progress = make_progress(True, total=20_000, desc="map", file=log)
    for _ in range(20_000):
        progress.advance()
    progress.close()
    text = log.getvalue()
    assert len(text) < 300 and text.count("\n") == 1
    assert "\r" not in text and "\x1b" not in text


CLOCK_TIMES = [
    *range(-4000, 4000, 7),
    *range(0, 400_000, 997),
    *(n + f for n in (0, 59, 60, 3599, 3600, 86_399, 86_400) for f in (0.0, 0.4, 0.999)),
    -0.5, -0.999, -1.0, -59.9, -3600.5, 1e7, 359_999, 360_000, 10**12, -(10**12), 1e15,
]  # fmt: skip


def test_clock_time_is_tqdms_format_interval() -> None:
    for seconds in CLOCK_TIMES:
        assert _progress._clock_time(seconds) == _std_tqdm.format_interval(seconds), seconds


@pytest.mark.parametrize("seconds", [math.inf, -math.inf, math.nan])
def test_clock_time_fails_like_tqdm_on_non_finite(seconds: float) -> None:
    with pytest.raises((OverflowError, ValueError)) as tqdms:
        _std_tqdm.format_interval(seconds)
    with pytest.raises(tqdms.type):
        _progress._clock_time(seconds)


def test_closed_log_stream_does_not_break_the_run(clock: FakeClock) -> None:
    log = io.StringIO()
    progress = LogProgress(total=1, desc=None, file=log, clock=clock)
    log.close()
    progress.close()  # no exception


def test_log_mode_writes_worker_lines_through(
    capsys: pytest.CaptureFixture[str], log: io.StringIO
) -> None:
    progress = LogProgress(total=2, desc="job", file=log)
    progress.write("out 1\nout 2\n")
    progress.write("err 1\n", stream="stderr")
    captured = capsys.readouterr()
    assert captured.out == "out 1\nout 2\n" and captured.err == "err 1\n"
    assert log.getvalue() == ""
    progress.close()


# -- the live bar (TqdmProgress) ----------------------------------------------------------------


def test_bar_shows_count_percent_rate_elapsed_and_eta(clock: FakeClock) -> None:
    tty = FakeTTY()
    progress = TqdmProgress(total=10, desc="job", file=tty, clock=clock)
    for _ in range(5):
        clock.advance(1)
        progress.advance()
    shown = screen(tty.getvalue())[-1]
    assert re.match(r"job:  50%\|.*\| 5/10 \[00:05<00:05, +1\.00task/s\]$", shown), shown
    progress.close()


def test_bar_postfix_shows_failed_and_retried(clock: FakeClock) -> None:
    tty = FakeTTY()
    progress = TqdmProgress(total=10, desc="job", file=tty, clock=clock)
    clock.advance(1)
    progress.advance()
    assert "failed" not in tty.getvalue() and "retried" not in tty.getvalue()
    progress.add_failed(2)
    progress.add_retried()
    clock.advance(1)
    progress.advance()
    assert screen(tty.getvalue())[-1].endswith("task/s, failed=2, retried=1]")
    progress.close()


def test_bar_without_total_counts(clock: FakeClock) -> None:
    tty = FakeTTY()
    progress = TqdmProgress(total=None, desc="scan", file=tty, clock=clock)
    clock.advance(2)
    progress.advance(7)
    assert re.match(r"scan: 7task \[00:02, +3\.50task/s\]$", screen(tty.getvalue())[-1])
    progress.set_total(7)
    assert "7/7" in screen(tty.getvalue())[-1]
    progress.close()


def test_bar_overrun_total_is_shown_as_a_count(clock: FakeClock) -> None:
    tty = FakeTTY()
    progress = TqdmProgress(total=4, desc="job", file=tty, clock=clock)
    clock.advance(1)
    progress.advance(6)
    assert screen(tty.getvalue())[-1].startswith("job: 6task [00:01")
    progress.close()


def test_bar_ticks_while_nothing_completes(clock: FakeClock) -> None:
    tty = FakeTTY()
    progress = TqdmProgress(total=10, desc="job", file=tty, clock=clock)
    assert progress.wakeup_in() == 1.0
    clock.advance(0.4)
    assert progress.wakeup_in() == pytest.approx(0.6)
    progress.tick()
    drawn = tty.getvalue()
    assert "00:00" in screen(drawn)[-1]
    clock.advance(2.6)
    assert progress.wakeup_in() == 0.0
    progress.tick()
    assert tty.getvalue() != drawn and "[00:03<?" in screen(tty.getvalue())[-1]
    assert progress.wakeup_in() == 1.0
    progress.close()
    assert progress.wakeup_in() is None


@pytest.mark.parametrize(
    ("outcome", "mark"),
    [
        ("done", "]"),
        ("error", ", stopped]"),
        ("interrupted", "interrupted]"),
        ("closed", "closed]"),
    ],
)
def test_bar_close_leaves_the_final_state(
    clock: FakeClock, outcome: _progress.Outcome, mark: str
) -> None:
    tty = FakeTTY()
    progress = TqdmProgress(total=10, desc="job", file=tty, clock=clock)
    clock.advance(1)
    progress.advance(3)
    progress.close(outcome)
    assert tty.getvalue().endswith("\n")
    final = screen(tty.getvalue())
    assert len(final) == 1 and "3/10" in final[0] and final[0].endswith(mark)


def test_bar_close_is_idempotent(clock: FakeClock) -> None:
    tty = FakeTTY()
    progress = TqdmProgress(total=2, desc="job", file=tty, clock=clock)
    progress.advance(2)
    progress.close()
    once = tty.getvalue()
    progress.close("error")
    progress.tick()
    assert tty.getvalue() == once


def test_log_close_is_idempotent(log: io.StringIO) -> None:
    progress = LogProgress(total=2, desc="job", file=log)
    progress.close()
    progress.close("interrupted")
    assert len(lines_of(log)) == 1 and progress.closed


def test_worker_output_goes_above_the_bar(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    tty = FakeTTY()  # one terminal: the bar and the worker's stderr share it
    monkeypatch.setattr(sys, "stderr", tty)
    progress = make_progress(True, total=10, desc="job", clock=clock)
    clock.advance(1)
    progress.advance(4)
    progress.write("worker says hi\nand more\n", stream="stderr")
    progress.write("no newline", stream="stderr")
    clock.advance(1)
    progress.advance(1)
    shown = screen(tty.getvalue())
    assert shown[:3] == ["worker says hi", "and more", "no newline"]
    assert len(shown) == 4 and shown[3].startswith("job:  50%")
    progress.close()


def test_worker_stdout_goes_to_stdout_whole(
    capsys: pytest.CaptureFixture[str], clock: FakeClock
) -> None:
    tty = FakeTTY()
    progress = TqdmProgress(total=10, desc="job", file=tty, clock=clock)
    progress.write("line 1\nline 2\n")
    assert capsys.readouterr().out == "line 1\nline 2\n"
    assert screen(tty.getvalue()) == [screen(tty.getvalue())[-1]]  # bar redrawn in place
    progress.close()
    progress.write("after close\n")
    assert capsys.readouterr().out == "after close\n"


def test_null_progress_counts_and_writes_through(capsys: pytest.CaptureFixture[str]) -> None:
    progress = make_progress(False, total=3, desc=None)
    progress.advance(2)
    progress.add_failed()
    progress.write("hello\n")
    progress.write("oops\n", stream="stderr")
    assert (progress.completed, progress.failed, progress.wakeup_in()) == (2, 1, None)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("hello\n", "oops\n")
    progress.tick()
    progress.close()


def test_tqdm_env_settings_win_over_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _tqdm_bar._tqdm_options()["mininterval"] == 0.1
    monkeypatch.setenv("TQDM_MININTERVAL", "5")
    assert "mininterval" not in _tqdm_bar._tqdm_options()
    assert _tqdm_bar._tqdm_options()["smoothing"] == 0.1


def test_unsized_terminal_still_gets_a_bar() -> None:
    usable = _tqdm_bar._usable_shape(lambda _: (-1, -1))
    assert usable(None) == (None, None)
    assert _tqdm_bar._usable_shape(lambda _: (79, 23))(None) == (79, 23)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_real_unsized_pty_draws() -> None:
    master, slave = os.openpty()  # a fresh pty reports 0 columns: plain tqdm draws nothing
    try:
        with os.fdopen(os.dup(slave), "w") as tty:
            progress = make_progress(True, total=2, desc="pty", file=tty)
            assert isinstance(progress, TqdmProgress)
            progress.advance(2)
            progress.close()
        # One read may return only the first redraw: read whatever the pty holds.
        drawn = b""
        while b"pty: 100%" not in drawn and select.select([master], [], [], 1.0)[0]:
            drawn += os.read(master, 65536)
        assert b"pty: 100%" in drawn
    finally:
        os.close(slave)
        os.close(master)


# -- import cost --------------------------------------------------------------------------------


def _loads_tqdm(code: str) -> bool:
    """Whether running ``code`` in a fresh interpreter imports tqdm (or any part of it)."""
    probe = "\nimport sys\nprint(any(m == 'tqdm' or m.startswith('tqdm.') for m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code + probe],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] == "True"


FAKE_TTY = "import io\nclass TTY(io.StringIO):\n    def isatty(self): return True\n"


@pytest.mark.parametrize(
    ("code", "loads"),
    [
        ("import multitrack", False),
        ("import multitrack, multitrack._api", False),
        ("import multitrack; multitrack.map", False),
        (
            "import io\nfrom multitrack._progress import LogProgress, make_progress\n"
            "p = make_progress(True, total=3, desc=None, file=io.StringIO())\n"
            "assert isinstance(p, LogProgress)\np.advance(3)\np.close()",
            False,
        ),
        (
            "import io\nfrom multitrack._progress import LogProgress, make_progress\n"
            "p = make_progress('log', total=3, desc=None, file=io.StringIO())\n"
            "assert isinstance(p, LogProgress)\np.close()",
            False,
        ),
        (
            "import io\nfrom multitrack._progress import NullProgress, make_progress\n"
            "p = make_progress(False, total=3, desc=None, file=io.StringIO())\n"
            "assert type(p) is NullProgress\np.advance(3)\np.close()",
            False,
        ),
        (  # the control: a live bar does load tqdm, so the probe can see it
            FAKE_TTY + "from multitrack._progress import TqdmProgress, make_progress\n"
            "p = make_progress(True, total=3, desc=None, file=TTY())\n"
            "assert isinstance(p, TqdmProgress)\np.close()",
            True,
        ),
    ],
    ids=["package", "api", "map-attribute", "log-auto", "log-forced", "null", "live-bar"],
)
def test_tqdm_is_imported_only_for_the_live_bar(code: str, loads: bool) -> None:
    assert _loads_tqdm(code) is loads


# -- lifetime -----------------------------------------------------------------------------------


def test_no_thread_is_started_or_left(clock: FakeClock) -> None:
    before = threading.active_count()
    progress = TqdmProgress(total=100, desc="job", file=FakeTTY(), clock=clock)
    for _ in range(100):
        progress.advance()
    progress.tick()
    assert threading.active_count() == before  # no tqdm monitor thread
    progress.close()
    assert threading.active_count() == before


def _block(progress: Progress, error: BaseException | None) -> None:
    with progress as entered:
        assert entered is progress
        entered.advance()
        if error is not None:
            raise error


@pytest.mark.parametrize(
    ("error", "word"),
    [(None, "done"), (ValueError("boom"), "stopped"), (KeyboardInterrupt(), "interrupted")],
)
def test_context_manager_closes_with_the_outcome(
    log: io.StringIO, error: BaseException | None, word: str
) -> None:
    progress = LogProgress(total=1, desc="job", file=log)
    if error is None:
        _block(progress, None)
    else:
        with pytest.raises(type(error)):
            _block(progress, error)
    assert log.getvalue().startswith(f"job: {word} 1/1 (100%)")
    assert progress.closed


def test_advance_is_cheap() -> None:
    bars: list[Progress] = [
        LogProgress(total=None, desc=None, file=io.StringIO()),
        TqdmProgress(total=None, desc=None, file=FakeTTY()),
    ]
    for progress in bars:
        start = time.perf_counter()
        for _ in range(50_000):
            progress.advance()
        per_call = (time.perf_counter() - start) / 50_000
        progress.close()
        assert per_call < 20e-6, f"{type(progress).__name__}: {per_call * 1e6:.1f} us per advance"


def test_public_names() -> None:
    assert set(_progress.__all__) >= {
        "LogProgress",
        "NullProgress",
        "Progress",
        "TqdmProgress",
        "make_progress",
    }
    for cls in (NullProgress, TqdmProgress, LogProgress):
        assert issubclass(cls, Progress)


@pytest.mark.parametrize(
    ("failed", "outcome", "style"),
    [(0, "done", "closed"), (1, "done", "failed"), (0, "interrupted", "failed")],
)
def test_the_widget_ends_in_the_failure_style_when_tasks_failed(
    monkeypatch: pytest.MonkeyPatch, failed: int, outcome: str, style: str
) -> None:
    # tqdm's widget turns green whenever its count reached the total, and failed tasks count.
    ends: list[str] = []

    class Widget(_tqdm_bar._BarMixin, _std_tqdm):  # type: ignore[misc]
        def close(self) -> None:
            ends.append("closed")
            super().close()

        def close_failed(self) -> None:
            ends.append("failed")
            super().close()

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(_progress, "_in_notebook", lambda: True)
    monkeypatch.setattr(_tqdm_bar, "_widget_class", lambda: Widget)
    progress = make_progress(True, total=2, desc="nb")
    assert isinstance(progress, TqdmProgress) and progress.is_widget
    progress.advance(2)
    if failed:
        progress.add_failed(failed)
    progress.close(outcome)  # type: ignore[arg-type]
    assert ends == [style]
